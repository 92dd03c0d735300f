export { default as Uppy } from "@uppy/core";
export { default as XHRUpload } from "@uppy/xhr-upload";
